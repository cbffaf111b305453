"""``natrio bench``: natrio side by side with plain nats-py workers, scenario by scenario.

``workload`` is what every contestant runs, ``contestants`` the natrio programs,
``natrio._asyncio.baselines`` the plain nats-py ones, ``scenarios`` starts the servers and
runs them all, ``report`` turns the figures into a table, JSON and a plot.
"""

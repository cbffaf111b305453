"""Everything natrio runs on asyncio: the adapter over nats-py (:mod:`.nats_client`), and for
``natrio bench`` the plain nats-py baselines, the FastStream and taskiq peers and the way
they run on asyncio's own loop (:mod:`.plain`). No other module imports asyncio,
trio_asyncio or nats."""

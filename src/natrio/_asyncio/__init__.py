"""Everything natrio runs on asyncio: the connection bridge, and the plain nats-py baselines
``natrio bench`` measures natrio against. No other module imports asyncio, trio_asyncio or nats."""

"""Everything natrio runs on asyncio: the adapter over nats-py (:mod:`.nats_client`) and the
plain nats-py baselines ``natrio bench`` measures natrio against. No other module imports
asyncio, trio_asyncio or nats."""

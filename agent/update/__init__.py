"""Release updates on the device, in parts; ``agent.updater.Updater`` puts them together.

Layout under ``state_dir``::

    releases/<version>/             unpacked release; .fleet/payload.tar and .fleet/manifest.json beside it
    current -> releases/<version>   the running release; switched with one rename (atomic)
    downloads/<target-hex>.part     artifact being fetched; verified chunks are listed in agent.db
    downloads/<target-hex>.payload  the payload decoded from it, moved into the release once unpacked

``releases``  what is installed and which release runs (agent.db keys, manifests)
``download``  the artifact over MQTT or HTTPS into the ``.part`` file and its chunk records
``decode``    the signed manifest checked; the assembled artifact verified and decoded (full or delta)
``install``   unpack, switch the ``current`` link, health gate, rollback, garbage collection and
              crash recovery
``hooks``     what these parts ask of the rest of the agent
"""

"""The estate portal: MQTT ingest of gateway events, its own store, and the guardroom web pages."""

"""One region's replica: events, schema, LMDB log, views, HTTP API, CLI."""

"""PostgreSQL side of graphinfer: the connection pool, migrations and queries."""

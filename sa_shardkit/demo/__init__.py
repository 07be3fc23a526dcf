"""The demo schema (customers, orders, order items, a reference table) and the `shardkit demo` story."""

"""The built-in DNS proxy: interception, policy, cache and upstreams."""

"""The client side of the Unix socket: a small HTTP client (`client`), the terminal chat
(`chat`) and the `complete`, `status` and `reload` commands (`commands`). No torch."""

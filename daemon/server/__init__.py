"""`inflightd serve`: the daemon's lifecycle (`daemon`: sockets, signals, systemd, drain), the
aiohttp application (`app`: native msgpack route, health, metrics, status, reload;
`openai_routes`), request parsing (`requests`) and the wire shapes (`protocol`), the bridge to
the engine (`service`: model loading, reloads, intake; `streams`: each request's outputs), the
YAML config (`config`), Prometheus metrics, socket safety and sd_notify.

Importing it loads no torch: the model and the engine's step loop are imported once the socket
answers, so `/health` says "loading" within a second of the start."""

"""The operator's jobs board: `GET /board`, live over server-sent events.

Phases, one module each: `auth` (password, session cookie, CSRF, login rate limit, the API
gate), `model` (pure view models), `source` (the data-source protocol), `embedded` and `convex`
(its two implementations), `live` (one shared poller fanning out to every open board),
`routes` (the thin Starlette edge and its templates).
"""

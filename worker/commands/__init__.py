"""The commands, each saying only what its work is: `run`, `sync` (and its rounds), `export`
(which run on what worker/session.py opens), `validate` and `report`; `paging` asks for the
List pages a listing needs, a window at a time."""

"""`spot-agent simulate` (placeholder)."""


def register(sub):
    p = sub.add_parser("simulate", help="(not yet implemented)")
    p.set_defaults(func=lambda args: 1)

"""`spot-agent run` (placeholder)."""


def register(sub):
    p = sub.add_parser("run", help="(not yet implemented)")
    p.set_defaults(func=lambda args: 1)

"""`spot-agent volumes` (placeholder until its issue lands)."""


def register(sub):
    p = sub.add_parser("volumes", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("spot-agent volumes: not implemented yet"), 1)[1])

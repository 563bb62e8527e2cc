"""`spot-agent sync` (placeholder until its issue lands)."""


def register(sub):
    p = sub.add_parser("sync", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("spot-agent sync: not implemented yet"), 1)[1])

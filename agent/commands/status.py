"""`spot-agent status` (placeholder until its issue lands)."""


def register(sub):
    p = sub.add_parser("status", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("spot-agent status: not implemented yet"), 1)[1])

"""`spot-agent drain` (placeholder until its issue lands)."""


def register(sub):
    p = sub.add_parser("drain", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("spot-agent drain: not implemented yet"), 1)[1])

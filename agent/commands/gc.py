"""`spot-agent gc` (placeholder until its issue lands)."""


def register(sub):
    p = sub.add_parser("gc", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("spot-agent gc: not implemented yet"), 1)[1])

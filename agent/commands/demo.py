"""`spot-agent demo` (placeholder until its issue lands)."""


def register(sub):
    p = sub.add_parser("demo", help="(not yet implemented)")
    p.set_defaults(func=lambda args: (print("spot-agent demo: not implemented yet"), 1)[1])

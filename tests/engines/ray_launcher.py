"""`ray` as a test may run it here: kept on 127.0.0.1.

Ray rewrites 127.0.0.1 to the machine's network address and binds every interface by default; tests
must stay on loopback, so this launcher turns the rewrite off before handing over to Ray's own CLI
(`python ray_launcher.py start ...`, `python ray_launcher.py drain-node ...`).
"""

import sys

import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(main())

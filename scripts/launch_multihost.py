"""Launch one generate over several processes: the same as `realm-jax launch` (realm_jax/distributed/launch.py).

    python scripts/launch_multihost.py --processes 2 --cpu-devices 2 -- generate "Once upon a time" --mesh model=4
    python scripts/launch_multihost.py --hosts node0,node1 -- generate "Once upon a time" --mesh model=16

The first starts 2 processes on this host (2 simulated CPU devices each) and supervises them; the second
prints the command to run on each host. `realm-jax launch --help` lists every option.
"""

import sys

from realm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["launch", *sys.argv[1:]]))

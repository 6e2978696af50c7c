"""`torchrun --nproc-per-node N -m rcdeploy.train ...`: one rank of a training job, with the options of
`rcdeploy train` (torchrun sets RANK, WORLD_SIZE and the rendezvous; rank 0 writes the run folder).

An entry point, like `rcdeploy.cli` itself: it hands the arguments to the `train` command.
"""

import sys

from rcdeploy.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])

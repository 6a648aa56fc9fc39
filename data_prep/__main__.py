"""`python -m data_prep ...` = `retro-dist prepare ...` (what mpirun / srun start on every rank)."""

from data_prep.pipeline import main

raise SystemExit(main())

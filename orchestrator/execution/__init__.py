"""Everything that runs on Ray, in one room: the Tune sweep (one trial per grid point, each a driver running a
Ray Train trainer), the trainer and the torch.distributed backend it opens on its workers, the callback that
forwards epoch reports to Tune, and the cluster's resources. Ray's private API is used in `ray_private` alone,
which checks the Ray version it was written for.

    sweep        run_sweep (Tune), run_single (one trial, no Tune), run_trial (a trial's driver)
    cluster      joining or starting Ray, what trial drivers hold, whether a trial can ever be placed
    trainer      the Ray Train trainer, its process-group backend and the workers' entry point (no torch here)
    tune_report  the epoch-end reports Ray Train forwards to Tune (light: Ray Train's controller imports it)
    progress     the sweep's console: a row per trial redrawn on a terminal, else a line per trial event
    ray_private  Ray's private API, version-checked

This package imports nothing itself: each process imports only the module it runs.
"""

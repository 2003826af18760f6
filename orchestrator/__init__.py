"""Run sweeps of diffusion-model trials on Ray Tune, recorded in MLflow (see ``orchestrator.cli``)."""

# Exit status of every command: 0 done, 1 a trial (or a submission) failed, 2 bad input, 130 interrupted.
EXIT_OK, EXIT_TRIAL_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

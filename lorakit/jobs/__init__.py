"""What turns a job into a run: the job file and its flags, the base model, the run directory, the
distributed side of a job, and a finished run's adapter."""

"""What a run leaves behind: the HDF5 run record, checkpoints, the progress line and reports."""

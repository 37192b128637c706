"""The data-parallel schedule without Ray: how the calibration windows are shared among
workers (`shares`), the collective that sums and broadcasts tensors among them (`collective`),
and what one worker does over a whole run (`worker`)."""

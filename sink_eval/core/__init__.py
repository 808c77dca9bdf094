"""What every layer uses: the one user-facing error, atomic files, typed results on disk, a model's attention shape,
the streaming window, registered attention implementations, and resumable work directories."""

"""Which models exist, where their files are, and what is resident on which worker."""

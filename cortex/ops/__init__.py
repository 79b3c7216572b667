"""Operations: metrics, the admin socket, systemd notification, reload, drain, request logs."""

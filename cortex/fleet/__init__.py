"""The fleet: peers, routing, placement and the proxy that forwards requests to other leaders."""

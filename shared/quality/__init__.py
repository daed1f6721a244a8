"""Model quality: the probe suite (ours, versioned), the detectors over probe results, and the route status
machine. Pure code — no I/O — so each part is tested as a unit with a seeded random generator; the probe
runner (`shared.workers.probes`) does the sending and storing."""

"""Stage-2 semi-supervised student training (SSL4MIS UNet; labeled-only, mean teacher, BCP, BCP+VESSA)."""

"""Lambda code of the imaging workflow: one thin handler module per state, and the domain modules they share."""

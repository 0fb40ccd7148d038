"""Pure tensor functions behind NSDS's two aspects; no model knowledge lives here."""

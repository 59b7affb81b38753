"""allotment for crewai."""

"""Memory: predicting a run's peak (plan) and measuring it (monitor)."""

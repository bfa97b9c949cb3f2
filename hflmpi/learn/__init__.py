"""What a client learns with: datasets, their partition over clients, models and the local solver."""

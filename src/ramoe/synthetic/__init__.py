"""The synthetic parallel world: languages derived from English, tasks, and the pretraining mixture."""

"""Training loops: pretraining the tiny MoE of the synthetic world."""

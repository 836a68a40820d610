"""MT-Bench: answers to its questions and the pairwise judge (its prompts apart), above training/."""

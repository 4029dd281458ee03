"""Schedule search: tuning which layers a draft skips (`selfspec tune`)."""

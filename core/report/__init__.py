"""Numbers for people: evaluation on a labelled folder, the paper's tables and figures, studies."""

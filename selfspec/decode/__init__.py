"""The decode loop for one sequence (`loop`): rounds of draft, verify and accept (`verify`)."""

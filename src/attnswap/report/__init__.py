"""An HTML and markdown report of run folders: it reads what the stages wrote and lays it out."""

"""Layer scorers: NSDS (nsds.py), its ablations, and published baselines, each from a Subject
(subject.py) to one sensitivity per decoder layer; specs.py lists them as data."""

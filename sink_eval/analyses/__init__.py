"""What the sink measurements say: `analyze` (a model on a prompt set), `taxonomy` (head classes by length), `scale`
(several models' analyses and the original notes' claims)."""

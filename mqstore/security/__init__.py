"""Security of nodes: certificates (:mod:`.certs`), TLS credentials (:mod:`.tls`), bearer tokens
(:mod:`.tokens`), authentication and authorization (:mod:`.auth`) and the limits enforced at the
network edge (:mod:`.edge`)."""

"""The seed's examples: ``tasks`` defines a Server and its tasks, ``send`` sends some of them."""

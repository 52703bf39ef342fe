"""Small machinery apps that test processes run with ``machinery worker -A apps.<module>:server``."""

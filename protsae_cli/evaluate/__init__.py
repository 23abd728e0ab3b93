"""How good an SAE is: metrics, `protsae eval`, and `protsae calibrate`."""

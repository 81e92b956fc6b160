<?php
/**
 * Registers Breakwater_AiBridge with Magento. Outside Magento (the plain-PHP tests) the
 * registrar class does not exist and this file does nothing.
 */
declare(strict_types=1);

if (class_exists(\Magento\Framework\Component\ComponentRegistrar::class)) {
    \Magento\Framework\Component\ComponentRegistrar::register(
        \Magento\Framework\Component\ComponentRegistrar::MODULE,
        'Breakwater_AiBridge',
        __DIR__
    );
}
